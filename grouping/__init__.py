"""Token importance and groups: the strategies (tfidf.py, reference.py, semantic.py), their plug-in
registry (registry.py) and the assignment of group ids from scores (assign.py).  docs/method.md
describes what each strategy scores and how groups are cut.
"""
