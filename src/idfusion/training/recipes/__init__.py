"""Training recipes, one module per method; registered by name in :data:`idfusion.training.recipe.RECIPES`."""
