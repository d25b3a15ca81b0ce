"""reasonembed: reasoning-intensive embedding models on Ray (ReasonEmbed, arXiv 2510.08252)."""
__version__ = "0.1.0"
