"""What a plone.recipe.zope2instance part tells us, read the way that recipe reads it.

The gunicorn part serves the instance's Zope: its ``zope.conf``, its eggs,
its ``http-address`` and ``threads``, its filter pipeline, and whether its
database is shared with other processes (ZEO or RelStorage client).
"""

import os
import re

import zc.buildout

INSTANCE_RECIPES = ("plone.recipe.zope2instance",)
DEFAULT_PIPELINE = "translogger\negg:Zope#httpexceptions\nzope"


class Instance:
    """One plone.recipe.zope2instance part, seen from another part."""

    def __init__(self, buildout, part, name):
        if name not in buildout:
            raise zc.buildout.UserError(
                f"[{part}] instance = {name}: there is no part [{name}] in this "
                "buildout; name the plone.recipe.zope2instance part to serve")
        # Looking the section up makes buildout install that part before ours.
        self.options = options = buildout[name]
        # "name", "name:entry", or a requirement: "name >= 6.0"
        recipe = re.split(r"[\s:<>=!~\[;]", options.get("recipe", "").strip(), maxsplit=1)[0]
        if recipe not in INSTANCE_RECIPES:
            raise zc.buildout.UserError(
                f"[{part}] instance = {name}: part [{name}] uses recipe "
                f"{recipe or '(none)'!r}, not plone.recipe.zope2instance; name "
                "a plone.recipe.zope2instance part")
        self.name = name
        directory = buildout["buildout"]["directory"]
        self.location = options.get("location") or os.path.join(
            buildout["buildout"]["parts-directory"], name)
        self.zope_conf = options.get("zope-conf") or os.path.join(
            self.location, "etc", "zope.conf")
        self.var = options.get("var") or os.path.join(directory, "var")
        self.http_address = options.get("http-address", "0.0.0.0:8080")
        self.threads = options.get("threads", "4")
        self.eggs = options.get("eggs", "")
        self.extra_paths = options.get("extra-paths", "")
        self.pipeline = (options.get("pipeline") or DEFAULT_PIPELINE).split()
        # A ZEO client cache in a file that one process may open (locked).
        self.zeo_client_client = options.get("zeo-client-client", "").strip()

    @property
    def shares_database(self):
        """True when other processes may open the same database safely.

        A ZEO client or a RelStorage instance: several gunicorn workers are
        safe.  Anything else is a FileStorage that one process must own.
        """
        zeo = self.options.get("zeo-client", "").strip().lower()
        return zeo in ("on", "true", "yes", "1") or bool(
            self.options.get("rel-storage", "").strip())
