"""One bench case: what it is (:class:`CaseSpec`), how it runs in one process (the runner, handed to a launcher
for many ranks), and what a case needs around the step: the attention kernel router and the meta device."""
