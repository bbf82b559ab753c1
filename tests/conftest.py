# Importing pollen first sets Flower's offline switches before any test imports flwr.
import pollen  # noqa: F401
