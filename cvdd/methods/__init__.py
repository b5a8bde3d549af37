"""Distillation methods: each makes an image set (:class:`~cvdd.methods.base.Method`); ``conf/method/`` picks one.

* ``cvdd``, ``sre2l``: :class:`~cvdd.methods.committee_voting.CommitteeVoting` (CV-DD; SRe2L++ with one model)
* ``rded``: :class:`~cvdd.methods.rded.RDED` (realistic patches, no optimisation)
* ``random_real``: :class:`~cvdd.methods.random_real.RandomReal` (seeded real images)
* ``herding``: :class:`~cvdd.methods.herding.Herding` (a coreset on teacher features)
"""
