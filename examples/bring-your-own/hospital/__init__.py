"""A hospital's own code: its model (model.py) and how it reads its own image folder (data.py).

Nothing here is privfl's: privfl imports it by path (``hospital.model:make_net``,
``hospital.data:load_site``) and trains it with differential privacy.
"""
