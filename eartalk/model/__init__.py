"""The talking-head model: visual tokenizer, audio encoder and the SFA + FCIC transformer."""
