"""zc.buildout recipe serving a plone.recipe.zope2instance part through gunicorn."""
