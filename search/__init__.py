"""The search driver: command line, Ray Tune with OptunaSearch and ASHA, run folders, Ray job submission."""
