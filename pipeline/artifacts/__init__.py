"""The directories the stages write, each module owning both the writing and the reading of
its artifact: the head directory, the model directory, the fine-tune directory, the report."""
