"""Networks and the diffusion math: the frozen feature extractor, the LFDN, the schedule, EMA."""
