"""Backend kinds of spear_rt, one module each, loaded by entry point (group `spear_rt.backends`)."""
