"""Importers: public datasets in their own formats -> NIfTI in HU + a Decathlon datalist."""
