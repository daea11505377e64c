"""The LLM router: one OpenAI-compatible endpoint over many providers (issue 5, seed 004).

Modules: ``config`` (YAML schema, loading), ``discovery`` (model cache and its compact snapshot),
``query`` (model / alias / tag-query parsing), ``index`` (incremental model index), ``strategies``
(scoring), ``health`` (cooldown, EWMA stats), ``upstream`` (pooled HTTP client, in-process engine),
``executor`` (the one retry/failover layer), ``service`` (the router), ``app`` (HTTP endpoints).
"""
