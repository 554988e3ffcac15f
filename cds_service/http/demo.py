"""PLACEHOLDER (owned by the demo-page helper; replaced wholesale)."""
from flask import Blueprint

blueprint = Blueprint("demo", __name__)
