"""``cotune studio``: a local web page over the files a user already has (data, runs, eval output,
reviews) and a chat with the base and its adapters; see ``command`` for what it is given."""
