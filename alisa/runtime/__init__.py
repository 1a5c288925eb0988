"""The ALISA runtime: tiered KV engine, scheduling, cost model."""
