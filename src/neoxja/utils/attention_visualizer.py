"""`from neoxja.utils.attention_visualizer import AttentionMaskVisualizer`, the reference's import path; the class
lives in neoxja.visualization."""
from ..visualization import AttentionMaskVisualizer

__all__ = ["AttentionMaskVisualizer"]
