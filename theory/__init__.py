"""The paper's convergence theory on small problems: the central case and the federated one (convergence.py runs both)."""
