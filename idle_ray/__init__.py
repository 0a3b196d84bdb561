"""idle_ray: train and tune IDLE-Adapter recommenders on Ray."""
__version__ = "0.1.0"
