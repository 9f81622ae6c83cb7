"""The search over reduced configurations, without a Trainer: cached evaluation, per-layer sweeps,
the Pareto front, joint strategies, the decision, its held-out confirmation, and the pipeline that
runs them in order.
"""
