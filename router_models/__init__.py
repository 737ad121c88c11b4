"""Router training and evaluation (RouterDC); the serving side loads artifacts through coe."""
