"""`fastpar train`: a character-level LSTM language model trained data-parallel, pipeline-
parallel or both, on text every machine has (the Python standard library's sources)."""
