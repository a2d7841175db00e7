"""Small inputs written for hierarcaps (demo captions, profiles), shipped as ``hierarcaps.resources``."""
