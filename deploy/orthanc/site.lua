-- Site settings for routing.lua (loaded before it: see LuaScripts in orthanc.json).
ROUTE_FROM_AET = 'MODALITY'   -- calling AE title of the modality whose studies are analysed
ROUTE_TO = 'node'             -- name of the node in DicomModalities
