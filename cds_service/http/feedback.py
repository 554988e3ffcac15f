"""PLACEHOLDER (owned by the storage/feedback helper; replaced wholesale)."""
from flask import Blueprint

blueprint = Blueprint("feedback", __name__)
