"""Evaluation of a pruned model against its dense base: `metrics` (KL, NLL, teacher-forced),
`run` (`npc eval` and the service's quick check), `attribution` (is the persona recognisable),
`judge` (the paper's LLM-judge score)."""
