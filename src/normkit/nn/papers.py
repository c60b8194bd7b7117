"""Citations of the methods normkit implements (arXiv ids checked against arxiv.org listings)."""

from normkit.registry import Paper

LAYER_NORM = Paper("Layer Normalization", 2016, "1607.06450", "Ba, Kiros, Hinton")
RMS_NORM = Paper("Root Mean Square Layer Normalization", 2019, "1910.07467", "Zhang, Sennrich")
BATCH_NORM = Paper(
    "Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift",
    2015, "1502.03167", "Ioffe, Szegedy",
)
GROUP_NORM = Paper("Group Normalization", 2018, "1803.08494", "Wu, He")
INSTANCE_NORM = Paper(
    "Instance Normalization: The Missing Ingredient for Fast Stylization", 2016, "1607.08022",
    "Ulyanov, Vedaldi, Lempitsky",
)
SCALE_NORM = Paper(
    "Transformers without Tears: Improving the Normalization of Self-Attention", 2019, "1910.05895",
    "Nguyen, Salazar",
)
DYT = Paper("Transformers without Normalization", 2025, "2503.10622", "Zhu, Chen, He, LeCun, Liu")
