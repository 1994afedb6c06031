"""Trained models on new, unlabelled images: ``bundle`` packs trained runs, ``inspect`` runs them.

Sits on top of the stages (it may import ``core``, ``data``, ``models``, ``evaluation``, ``review``);
only ``cli`` imports it.
"""
