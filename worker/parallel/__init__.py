"""Expert-parallel worker groups on Ray (ranks, the group that steps them as one engine, its leader) and the
pool controller that keeps the configured groups alive."""
