"""`epserve-eval`: what each routing policy costs in quality and buys in balance.

Modules: corpus (the standard-library text and its held-out split, also what the tiny model
is trained on), probe (wraps a policy to measure it in place), teacher_forcing (held-out perplexity
through our own model), report (markdown, JSON, PNG), tradeoff (perplexity against rank
balance, one picture), exact_assignment (the LP optimum the capacity-solving policies are
measured against; needs scipy), cli (the command).
"""
