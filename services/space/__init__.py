"""The vector space every role shares: whitening/PCA, the indexed space, id rules, placement.

No role (extractor, shard, broker) owns this package, so roles never import each other.
"""
