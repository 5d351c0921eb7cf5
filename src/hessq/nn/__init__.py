"""Float modules hessq adds to PyTorch's: CoDeNet's deformable convolution and its ablation blocks."""

from hessq.nn._deform import VARIANTS, DeformConv2d, deform_block, deform_conv2d, deform_macs

__all__ = ["VARIANTS", "DeformConv2d", "deform_block", "deform_conv2d", "deform_macs"]
