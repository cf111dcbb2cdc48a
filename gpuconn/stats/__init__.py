"""Group statistics: designs, GLM, permutations and spatial inference."""
