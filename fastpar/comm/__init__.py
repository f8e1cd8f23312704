"""Collective communication: the native ring all-reduce and its building blocks."""

from fastpar.comm.reduce import reduce_buffers

__all__ = ["reduce_buffers"]
