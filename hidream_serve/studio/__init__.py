"""The web studio's static files (index.html, studio.js, studio.css), served by services/studio_routes.py."""
