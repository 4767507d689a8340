"""The single-process serving engine: paged KV block bookkeeping with prefix caching (`blocks`), the sampler
(`sampling`), and the scheduler that drives the model with them."""
