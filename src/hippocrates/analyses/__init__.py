"""The paper's analyses, which run evaluations: the stage ablation and the prompting sweep."""
