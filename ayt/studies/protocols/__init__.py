"""How a study compares its groups and decides: tune_then_repeat, search_then_confirm, seed
rounds, the seed plan, the endpoint and the decision level."""
