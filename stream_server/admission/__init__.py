"""Tiered admission: who gets the next GPU slot, in which order, and how long they will wait."""
