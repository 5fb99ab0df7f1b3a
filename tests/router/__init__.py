"""Tests of spear_rt.router: policies, filter, health, limits, accounting, executor, metrics."""
