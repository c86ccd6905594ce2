"""Where runs come from besides the wrapper's log: each input turns what it reads into the same
``records.Entry`` runs, so statistics, rules and verdicts mean the same thing for all of them."""
