"""The judge's text and data: prompt layout and score phrases, datasets (Feedback Collection,
the synthetic task), teacher-forced batches, RAIL inference, evaluation and correlation metrics."""
