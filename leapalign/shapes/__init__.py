"""The embedded shapes world: generator, exact evaluator, tiny text encoder and Flux model, learned reward."""
