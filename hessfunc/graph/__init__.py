"""The captured-graph engine: ``f`` traced to ATen ops once per signature
(:mod:`.capture`), the per-sample structure proved on the graph (:mod:`.samples`),
and exact curvature propagated over it (:mod:`.curvature`)."""
