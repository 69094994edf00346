"""The pod labeler: ModelMesh placement mirrored onto runtime pods' labels (`modelxds label`).

labels.py is the pure core (names, desired keys, merge patches); pods.py the pod cache
(list + watch); sync.py patches pods; leader.py the Lease; run.py the command.
"""
