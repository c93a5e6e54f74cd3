"""Analysis tools: emergent outlier features (LLM.int8(), Dettmers et al. 2022)."""
from lowbit.analysis.outliers import OutlierReport, ablate_dims, find_outliers, random_dims, token_windows

__all__ = ["OutlierReport", "ablate_dims", "find_outliers", "random_dims", "token_windows"]
