from clinicbox.cli import main

raise SystemExit(main())
