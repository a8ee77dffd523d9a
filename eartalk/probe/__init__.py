"""The probe: the measuring instrument. Trained only on rendered frames and their ground truth."""
