"""Image gradient-inversion attacks: the inversion loop (:mod:`~leak_audit.attacks.image.inversion`), the wrapper
the registered inversions share (:mod:`~leak_audit.attacks.image.base`), and one registered attack per module:
:mod:`~leak_audit.attacks.image.dlg`, :mod:`~leak_audit.attacks.image.inverting_gradients`,
:mod:`~leak_audit.attacks.image.labels`."""
