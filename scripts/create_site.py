"""Create the classic Plone site ``Plone`` and a page in it, once.

Run it with the instance, its ZEO server started::

    bin/zeoserver start
    bin/instance run scripts/create_site.py [SITE_ID]

``bin/instance run`` gives this script ``app``, the Zope root, with a
request.  The site is made from Plone 6.2's ``classic`` distribution
(plone.classicui), as the "Create a Plone site" form does; the Zope
``admin`` user of the instance (``user = admin:admin``) owns it.  A site
that already exists is left as it is, so running the script again is safe.
"""

import sys

import transaction
from AccessControl.SecurityManagement import newSecurityManager
from plone import api
from plone.distribution.api import site as site_api
from zope.component.hooks import setSite

# bin/instance run leaves its own arguments in sys.argv before this script's path.
_script = sys._getframe().f_code.co_filename
_args = sys.argv[sys.argv.index(_script) + 1:] if _script in sys.argv else sys.argv[1:]
SITE_ID = _args[0] if _args else "Plone"
PAGE_ID = "gunicorn"

app = globals()["app"]  # set by bin/instance run
admin = app.acl_users.getUserById("admin")
if admin is None:
    sys.exit("no user admin in the Zope root: set user = admin:admin in the instance part")
newSecurityManager(None, admin.__of__(app.acl_users))

if SITE_ID in app.objectIds():
    site = app[SITE_ID]
    print(f"Plone site /{SITE_ID} exists")
else:
    site = site_api.create(app, "classic", {
        "site_id": SITE_ID,
        "title": "Plone served by gunicorn",
        "description": "A classic Plone 6 site over ZEO, served by gunicorn",
        "default_language": "en",
        "portal_timezone": "UTC",
        "setup_content": False,
    })
    print(f"created Plone site /{SITE_ID}")

setSite(site)
if PAGE_ID not in site.objectIds():
    page = api.content.create(
        container=site, type="Document", id=PAGE_ID, title="Served by gunicorn",
        description="A page of this site, served by gunicorn workers over ZEO.")
    api.content.transition(obj=page, transition="publish")
    transaction.commit()
    print(f"created page /{SITE_ID}/{PAGE_ID}")
else:
    print(f"page /{SITE_ID}/{PAGE_ID} exists")
