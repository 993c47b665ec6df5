"""Side-by-side runs of a suite backend against public implementations of the same algorithm
(throwaway comparisons, kept so that a published comparison can be run again)."""
