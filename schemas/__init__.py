"""The taxonomy (what may be tagged) and the result types passed between stages."""
